import sys

from distar.train import main

sys.exit(main())
