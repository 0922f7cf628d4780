from ted_fl.bench import main

raise SystemExit(main())
