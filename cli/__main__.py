from schedscope.main import main

main()
