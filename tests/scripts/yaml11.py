#!/usr/bin/env python3
"""Prints the documents of YAML files as one JSON list, read by PyYAML: a YAML 1.1 reader
independent of Sidemesh's, to check that injection keeps every value's meaning. Empty
documents are left out, as kubectl leaves them out."""
import json
import sys

import yaml

docs = []
for path in sys.argv[1:]:
    with open(path, encoding="utf-8") as f:
        docs.extend(d for d in yaml.safe_load_all(f) if d is not None)
json.dump(docs, sys.stdout, default=str)
