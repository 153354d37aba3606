from hybridstack.cli import main

main()
