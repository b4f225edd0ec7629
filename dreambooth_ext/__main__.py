import sys

from dreambooth_ext.cli import main

sys.exit(main())
