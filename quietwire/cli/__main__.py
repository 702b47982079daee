import sys

from quietwire.cli import main

sys.exit(main())
