from schedscope.cli.main import main

main()
