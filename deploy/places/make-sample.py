#!/usr/bin/env python3
"""Build sample-cities.ndjson, the places file the README's first command loads.

Input: ../shared/data/cities1000.csv (GeoNames, CC BY 4.0). Output: the N most populous
cities as GeoJSON Features with a circular fence scaled to the population and a dwell time.
Usage: python3 deploy/places/make-sample.py [N] > deploy/places/sample-cities.ndjson
"""
import csv
import json
import math
import sys
from pathlib import Path

count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
source = Path(__file__).resolve().parents[3] / "shared" / "data" / "cities1000.csv"
with open(source, newline="", encoding="utf-8") as f:
    for i, row in enumerate(csv.DictReader(f)):
        if i >= count:
            break
        population = int(row["population"])
        radius_m = round(min(5000, max(300, 3 * math.sqrt(population))))
        feature = {
            "type": "Feature",
            "id": f"geonames-{row['geonameid']}",
            "geometry": {"type": "Point", "coordinates": [float(row["longitude"]), float(row["latitude"])]},
            "properties": {
                "name": row["name"],
                "tags": {"kind": "city", "country": row["country_code"], "population": population},
                "fence": {"radius_m": radius_m},
                "dwell_s": 300,
            },
        }
        print(json.dumps(feature, ensure_ascii=False, separators=(",", ":")))
