import sys
from cellmask.cli import main

sys.exit(main())
