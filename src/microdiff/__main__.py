from microdiff.cli import main

raise SystemExit(main())
