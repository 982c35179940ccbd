"""The stores other tools keep models in, read in their own on-disk formats (one module each: ollama, hub,
lmstudio), what a model folder's files are (files), and downloads from the Hub (pull). store.py looks
names up across them."""
