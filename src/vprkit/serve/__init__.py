"""`vprkit serve`: a map as an HTTP localization service, with a web page.

- `app`: the FastAPI application (`create_app(map, localizer, options)`), the token check,
  security headers, the page and its map library (Leaflet from the XStatic packages).
- `routes`: /api/localize, /api/map, /api/map/photos, /api/photos/{id}, /healthz.
- `pool`: the bounded worker pool (a full queue answers 503 with Retry-After).
- `uploads`: the body's size limit, multipart parts, decoding with a pixel limit.
- `thumbnails`: map photos by id, never by path.
- `server`: uvicorn on a socket bound first (tests use `ServerThread`).
- `command`: the `vprkit serve` verb.

Needs the `serve` extra: pip install "vprkit[serve]".
"""
