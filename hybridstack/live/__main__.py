"""``python -m hybridstack.live ui|serve ...`` (the same as ``hybridstack ui|serve``)."""

import sys

from hybridstack.live.commands import main

sys.exit(main())
