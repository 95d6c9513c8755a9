from sigmacli.app import main

main()
