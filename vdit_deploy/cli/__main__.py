from vdit_deploy.cli import main

main()
