from xbench.cli import main

main()
