"""The torch-free runtime that runs an exported bundle on a Jetson, a laptop GPU or a CPU."""
