"""Site data: nnU-Net raw dataset folders, image I/O, cropping, resampling, normalisation."""
