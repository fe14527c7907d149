"""Image data: the demo pool (Fashion-MNIST + bundled photos), IDX reading, manifests."""
