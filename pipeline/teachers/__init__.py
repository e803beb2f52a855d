"""The 2D teachers: the registry (build_teacher), the feature PCA and the 2D evaluation."""
