import sys

from sfumato.server.main import main

sys.exit(main())
