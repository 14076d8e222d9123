import sys

from facellava.cli import main

sys.exit(main())
