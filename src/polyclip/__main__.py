from polyclip.cli import main

main()
