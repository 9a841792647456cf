"""Each seed system's own task, built from the core API: geolocation (StreetCLIP), taxonomic
prediction (BioCLIP), medical VQA (PubMedCLIP), video-text retrieval (ClipBERT).

Submodules are imported on demand; this package imports none of them.
"""
