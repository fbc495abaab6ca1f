import sys

from sandbox_host.server import main

sys.exit(main())
