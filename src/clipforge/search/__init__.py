"""Image search: embed a collection with a CLIP model, index it with faiss, search it by text
or by image.

    clipforge index build --model CKPT --data folder:photos/ --out photos.index
    clipforge search photos.index "a red star" -k 10

    from clipforge.search import Index
    index = Index.load("photos.index")
    hits = index.search_text("a red star", k=10)      # [Hit(id, score, key, path, caption), ...]

Modules: `ann` (choosing, building and tuning the faiss index), `store` (the directory
layout), `build` (embedding a data source, resumably), `index` (search), `server` (the HTTP
service and web page).  faiss, pyarrow and the web service's packages come with the
``search`` extra; importing this package imports none of them (they load when first used).
"""

from __future__ import annotations

from clipforge.search.build import BuildReport, add_to_index, build_index, load_search_model
from clipforge.search.index import Hit, Index
from clipforge.search.store import IndexDirError

__all__ = ["BuildReport", "Hit", "Index", "IndexDirError", "add_to_index", "build_index", "load_search_model"]
