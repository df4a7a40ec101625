from attnconv.cli import main

main()
