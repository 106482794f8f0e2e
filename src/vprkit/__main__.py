import sys

from vprkit.cli import main

sys.exit(main())
