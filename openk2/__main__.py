from openk2.cli import main

main()
