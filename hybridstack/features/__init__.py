"""Pure feature transforms: text cleaning, TF-IDF, embeddings cache, kNN, lengths."""
