"""llamactl: the Llama 2 recipe as composable command-line stages on one model core."""

__version__ = "0.1.0"
