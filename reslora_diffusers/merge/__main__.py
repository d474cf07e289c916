from reslora_diffusers.merge.cli import main

raise SystemExit(main())
