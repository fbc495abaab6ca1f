import sys

from api.server import main

raise SystemExit(main(sys.argv[1:]))
