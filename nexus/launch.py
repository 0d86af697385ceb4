"""`python -m nexus.launch`: the documented way to run a pipeline.

The supervisor that starts, watches and restarts the process group lives in
`nexus.supervisor.launcher`; this module keeps the command name stable.
"""

import sys

from nexus.supervisor.launcher import main

if __name__ == "__main__":
    sys.exit(main())
