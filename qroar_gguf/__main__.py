from qroar_gguf.cli import main

main()
