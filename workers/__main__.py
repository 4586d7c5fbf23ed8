from workers.serve import main

main()
