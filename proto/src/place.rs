//! Places as GeoJSON Features (DESIGN §5), parsed and validated.
//!
//! ```json
//! {"type":"Feature","id":"cafe-17","geometry":{"type":"Point","coordinates":[13.405,52.52]},
//!  "properties":{"name":"Café 17","tags":{"kind":"cafe"},"fence":{"radius_m":150},"dwell_s":300}}
//! ```
//! `fence` is either `{"radius_m": r}` or a GeoJSON Polygon geometry (outer ring, then holes).

use crate::area::{AreaError, Polygon};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// Largest circular fence radius.
pub const MAX_FENCE_RADIUS_M: f64 = 50_000.0;
/// Longest dwell time, seconds (a week).
pub const MAX_DWELL_S: u32 = 7 * 24 * 3600;
/// Longest place id, in bytes.
pub const MAX_PLACE_ID_LEN: usize = 128;

/// A place's geofence.
#[derive(Clone, Debug, PartialEq)]
pub enum PlaceFence {
    /// Every point within `radius_m` great-circle metres of the place.
    Circle { radius_m: f64 },
    /// A GeoJSON polygon (edges straight in lon/lat), holes excluded.
    Polygon(Polygon),
}

/// A validated place.
#[derive(Clone, Debug, PartialEq)]
pub struct Place {
    pub id: String,
    pub name: String,
    pub lat: f64,
    pub lon: f64,
    pub tags: Map<String, Value>,
    pub fence: Option<PlaceFence>,
    /// Seconds inside the fence before a `dwell` event.
    pub dwell_s: Option<u32>,
}

/// Why a Feature is not a valid place.
#[derive(Clone, Debug, PartialEq, Error)]
pub enum PlaceError {
    #[error("not a JSON Feature: {0}")]
    NotAFeature(String),
    #[error("missing id (a non-empty string or a number, at most {MAX_PLACE_ID_LEN} bytes)")]
    MissingId,
    #[error("geometry must be a Point with [lon, lat] in range")]
    BadPoint,
    #[error("fence radius_m must be finite, > 0 and <= {MAX_FENCE_RADIUS_M}")]
    BadFenceRadius,
    #[error("fence polygon is invalid: {0}")]
    BadFencePolygon(AreaError),
    #[error("fence must be {{\"radius_m\": r}} or a GeoJSON Polygon")]
    BadFence,
    #[error("dwell_s must be an integer in 1..={MAX_DWELL_S}")]
    BadDwell,
    #[error("dwell_s needs a fence")]
    DwellWithoutFence,
    #[error("tags must be a JSON object")]
    BadTags,
    #[error("duplicate id {0:?}")]
    DuplicateId(String),
}

#[derive(Deserialize)]
struct FeatureIn {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    id: Option<Value>,
    geometry: Option<Value>,
    #[serde(default)]
    properties: Option<Map<String, Value>>,
}

fn point_of(geometry: Option<&Value>) -> Option<(f64, f64)> {
    let geometry = geometry?.as_object()?;
    if geometry.get("type")?.as_str()? != "Point" {
        return None;
    }
    let coordinates = geometry.get("coordinates")?.as_array()?;
    let (lon, lat) = (
        coordinates.first()?.as_f64()?,
        coordinates.get(1)?.as_f64()?,
    );
    let valid = lat.is_finite()
        && lon.is_finite()
        && (-90.0..=90.0).contains(&lat)
        && (-180.0..=180.0).contains(&lon);
    valid.then_some((lat, lon))
}

fn fence_of(value: &Value) -> Result<PlaceFence, PlaceError> {
    let object = value.as_object().ok_or(PlaceError::BadFence)?;
    if let Some(radius) = object.get("radius_m") {
        let radius_m = radius.as_f64().ok_or(PlaceError::BadFenceRadius)?;
        if !(radius_m.is_finite() && radius_m > 0.0 && radius_m <= MAX_FENCE_RADIUS_M) {
            return Err(PlaceError::BadFenceRadius);
        }
        return Ok(PlaceFence::Circle { radius_m });
    }
    if object.get("type").and_then(Value::as_str) == Some("Polygon") {
        let coordinates = object.get("coordinates").ok_or(PlaceError::BadFence)?;
        let polygon: Polygon = serde_json::from_value(coordinates.clone())
            .map_err(|_| PlaceError::BadFencePolygon(AreaError::NoRing))?;
        polygon.validate().map_err(PlaceError::BadFencePolygon)?;
        return Ok(PlaceFence::Polygon(polygon));
    }
    Err(PlaceError::BadFence)
}

impl Place {
    /// Parse and validate one GeoJSON Feature.
    pub fn from_feature_json(text: &str) -> Result<Place, PlaceError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| PlaceError::NotAFeature(e.to_string()))?;
        Place::from_feature(&value)
    }

    /// Validate one GeoJSON Feature value.
    pub fn from_feature(value: &Value) -> Result<Place, PlaceError> {
        let feature: FeatureIn = serde_json::from_value(value.clone())
            .map_err(|e| PlaceError::NotAFeature(e.to_string()))?;
        if feature.kind != "Feature" {
            return Err(PlaceError::NotAFeature(format!(
                "type is {:?}, not \"Feature\"",
                feature.kind
            )));
        }
        let id = match feature.id {
            Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_PLACE_ID_LEN => s,
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(PlaceError::MissingId),
        };
        let (lat, lon) = point_of(feature.geometry.as_ref()).ok_or(PlaceError::BadPoint)?;
        let properties = feature.properties.unwrap_or_default();
        let name = properties
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or(&id)
            .to_owned();
        let tags = match properties.get("tags") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(tags)) => tags.clone(),
            Some(_) => return Err(PlaceError::BadTags),
        };
        let fence = match properties.get("fence") {
            None | Some(Value::Null) => None,
            Some(value) => Some(fence_of(value)?),
        };
        let dwell_s = match properties.get("dwell_s") {
            None | Some(Value::Null) => None,
            Some(value) => {
                let dwell = value
                    .as_u64()
                    .filter(|d| (1..=u64::from(MAX_DWELL_S)).contains(d))
                    .ok_or(PlaceError::BadDwell)?;
                Some(dwell as u32)
            }
        };
        if dwell_s.is_some() && fence.is_none() {
            return Err(PlaceError::DwellWithoutFence);
        }
        Ok(Place {
            id,
            name,
            lat,
            lon,
            tags,
            fence,
            dwell_s,
        })
    }

    /// The place as a GeoJSON Feature.
    pub fn to_feature(&self) -> Value {
        let mut properties = Map::new();
        properties.insert("name".into(), Value::String(self.name.clone()));
        properties.insert("tags".into(), Value::Object(self.tags.clone()));
        match &self.fence {
            Some(PlaceFence::Circle { radius_m }) => {
                properties.insert("fence".into(), serde_json::json!({ "radius_m": radius_m }));
            }
            Some(PlaceFence::Polygon(polygon)) => {
                properties.insert(
                    "fence".into(),
                    serde_json::json!({ "type": "Polygon", "coordinates": polygon.rings }),
                );
            }
            None => {}
        }
        if let Some(dwell) = self.dwell_s {
            properties.insert("dwell_s".into(), Value::from(dwell));
        }
        serde_json::json!({
            "type": "Feature",
            "id": self.id,
            "geometry": { "type": "Point", "coordinates": [self.lon, self.lat] },
            "properties": properties,
        })
    }
}

/// A row of a places file that was not loaded.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RejectedRow {
    /// 1-based line for NDJSON, 0-based feature index for a FeatureCollection.
    pub position: usize,
    /// `"line"` or `"feature"`.
    pub unit: &'static str,
    pub reason: String,
}

/// The result of parsing a places file: the good places and every rejected row.
#[derive(Clone, Debug, Default)]
pub struct PlacesFile {
    pub places: Vec<Place>,
    pub rejected: Vec<RejectedRow>,
}

/// Parse a places file: a GeoJSON FeatureCollection, or NDJSON with one Feature per line
/// (blank lines skipped). Bad rows (and later duplicates of an id) are rejected with their
/// position and reason; the rest load.
pub fn parse_places_file(text: &str) -> PlacesFile {
    let mut out = PlacesFile::default();
    let mut seen = std::collections::HashSet::new();
    let mut accept = |out: &mut PlacesFile,
                      position: usize,
                      unit: &'static str,
                      parsed: Result<Place, PlaceError>| {
        let parsed = parsed.and_then(|place| {
            if seen.insert(place.id.clone()) {
                Ok(place)
            } else {
                Err(PlaceError::DuplicateId(place.id))
            }
        });
        match parsed {
            Ok(place) => out.places.push(place),
            Err(e) => out.rejected.push(RejectedRow {
                position,
                unit,
                reason: e.to_string(),
            }),
        }
    };
    let trimmed = text.trim_start();
    let collection = match serde_json::from_str::<Value>(trimmed) {
        Ok(Value::Object(object))
            if object.get("type").and_then(Value::as_str) == Some("FeatureCollection") =>
        {
            Some(object)
        }
        _ => None,
    };
    if let Some(collection) = collection {
        match collection.get("features").and_then(Value::as_array) {
            Some(features) => {
                for (index, feature) in features.iter().enumerate() {
                    accept(&mut out, index, "feature", Place::from_feature(feature));
                }
            }
            None => out.rejected.push(RejectedRow {
                position: 0,
                unit: "feature",
                reason: "FeatureCollection has no features array".into(),
            }),
        }
        return out;
    }
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        accept(&mut out, index + 1, "line", Place::from_feature_json(line));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAFE: &str = r#"{"type":"Feature","id":"cafe-17","geometry":{"type":"Point","coordinates":[13.405,52.52]},"properties":{"name":"Café 17","tags":{"kind":"cafe"},"fence":{"radius_m":150},"dwell_s":300}}"#;

    #[test]
    fn parses_the_design_example_and_round_trips() {
        let place = Place::from_feature_json(CAFE).expect("valid");
        assert_eq!(place.id, "cafe-17");
        assert_eq!((place.lat, place.lon), (52.52, 13.405));
        assert_eq!(place.fence, Some(PlaceFence::Circle { radius_m: 150.0 }));
        assert_eq!(place.dwell_s, Some(300));
        assert_eq!(
            Place::from_feature(&place.to_feature()).expect("round trip"),
            place
        );
    }

    #[test]
    fn polygon_fences_with_holes() {
        let text = r#"{"type":"Feature","id":7,"geometry":{"type":"Point","coordinates":[0.5,0.5]},"properties":{"fence":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1],[0,1],[0,0]],[[0.4,0.4],[0.6,0.4],[0.6,0.6],[0.4,0.4]]]}}}"#;
        let place = Place::from_feature_json(text).expect("valid");
        assert_eq!(place.id, "7");
        assert!(matches!(place.fence, Some(PlaceFence::Polygon(ref p)) if p.rings.len() == 2));
    }

    #[test]
    fn file_with_broken_rows_loads_the_good_ones() {
        let ndjson = [
            CAFE,
            r#"{"type":"Feature","id":"far","geometry":{"type":"Point","coordinates":[200,0]},"properties":{}}"#,
            r#"{"type":"Feature","geometry":{"type":"Point","coordinates":[1,1]},"properties":{}}"#,
            "",
            r#"{"type":"Feature","id":"poly","geometry":{"type":"Point","coordinates":[1,1]},"properties":{"fence":{"type":"Polygon","coordinates":[[[0,0],[1,0],[1,1]]]}}}"#,
            CAFE,
            "{not json",
            r#"{"type":"Feature","id":"ok2","geometry":{"type":"Point","coordinates":[2,2]},"properties":{"name":"Two"}}"#,
        ]
        .join("\n");
        let file = parse_places_file(&ndjson);
        let ids: Vec<_> = file.places.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, ["cafe-17", "ok2"]);
        let lines: Vec<_> = file.rejected.iter().map(|r| r.position).collect();
        assert_eq!(lines, [2, 3, 5, 6, 7]);
        assert!(file.rejected[3].reason.contains("duplicate"));

        let collection = format!(
            r#"{{"type":"FeatureCollection","features":[{CAFE},{{"type":"Feature","id":"x","geometry":null}}]}}"#
        );
        let file = parse_places_file(&collection);
        assert_eq!(file.places.len(), 1);
        assert_eq!(file.rejected[0].position, 1);
        assert_eq!(file.rejected[0].unit, "feature");
    }
}
