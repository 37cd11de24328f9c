"""Data: the datasets (ImageNette, CIFAR, ImageFolder...), image decoding and resizing, class names, caption
files, and the per-dataset defaults with their sources. It may import only vlcp.store.
"""
