import sys

from nexus.cli.commands import main

sys.exit(main())
