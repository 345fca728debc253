import sys

from .convert_checkpoint import main

sys.exit(main())
