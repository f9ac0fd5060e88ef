"""Video: tracks over frames and what Label Studio and CVAT make of them (issue 18, in progress)."""
