from rewardiff.cli import main

main()
