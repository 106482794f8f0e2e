// The vprkit map page: drop a photo, see where it was taken among the map's photos.
// Plain JavaScript on Leaflet (no build step). Without tiles the map is a plain metric
// grid (UTM metres, CRS.Simple): it works offline. With --tiles it draws over them.
"use strict";

(function () {
  const PAGE_SIZE = 48; // thumbnails per page in the photos view
  const $ = (id) => document.getElementById(id);
  const state = {
    token: null,
    config: null,
    info: null,
    photos: [],
    origin: { east: 0, north: 0 },
    map: null,
    photoLayer: null,
    photoMarkers: [],
    result: L.layerGroup(),
    estimateMarker: null,
    matchMarkers: [],
    last: null,
    page: 0,
  };

  // ------------------------------------------------------------------ the API

  async function api(path, options = {}) {
    const headers = Object.assign({}, options.headers || {});
    if (state.token) headers.Authorization = "Bearer " + state.token;
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try {
        message = (await response.json()).detail || message;
      } catch (e) {
        /* not JSON: keep the status line */
      }
      const error = new Error(message);
      error.status = response.status;
      throw error;
    }
    return response;
  }

  // <img src> cannot send the token, so with a token thumbnails come through fetch as blobs.
  async function setThumb(img, url) {
    if (!state.token) {
      img.src = url;
      return;
    }
    try {
      img.src = URL.createObjectURL(await (await api(url)).blob());
    } catch (e) {
      img.alt = "no thumbnail";
    }
  }

  function setStatus(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.classList.toggle("error", !!isError);
  }

  // ------------------------------------------------------------------ coordinates

  function toLatLng(p) {
    if (state.config.tiles) return L.latLng(p.latitude, p.longitude);
    return L.latLng(p.north - state.origin.north, p.east - state.origin.east);
  }

  function fromLatLng(ll) {
    if (state.config.tiles) return { latitude: ll.lat, longitude: ll.lng };
    return { east: ll.lng + state.origin.east, north: ll.lat + state.origin.north };
  }

  function niceStep(raw) {
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const f of [1, 2, 5, 10]) if (f * power >= raw) return f * power;
    return 10 * power;
  }

  // The offline background: grid lines every 1, 2 or 5 x 10^k metres of UTM east / north.
  const grid = L.layerGroup();
  let gridNote = null;
  function drawGrid() {
    grid.clearLayers();
    const b = state.map.getBounds();
    const span = Math.max(b.getEast() - b.getWest(), b.getNorth() - b.getSouth());
    if (!(span > 0)) return;
    const step = niceStep(span / 8);
    const style = { color: "#dde2ea", weight: 1, interactive: false };
    const o = state.origin;
    for (let e = Math.ceil((b.getWest() + o.east) / step) * step; e - o.east <= b.getEast(); e += step) {
      const x = e - o.east;
      L.polyline([[b.getSouth(), x], [b.getNorth(), x]], style).addTo(grid);
    }
    for (let n = Math.ceil((b.getSouth() + o.north) / step) * step; n - o.north <= b.getNorth(); n += step) {
      const y = n - o.north;
      L.polyline([[y, b.getWest()], [y, b.getEast()]], style).addTo(grid);
    }
    if (gridNote) gridNote.textContent = "grid: " + step + " m, UTM " + state.info.utm_zone.number + state.info.utm_zone.hemisphere;
  }

  function makeMap() {
    const el = $("map");
    if (state.config.tiles) {
      state.map = L.map(el, { preferCanvas: true });
      L.tileLayer(state.config.tiles, { maxZoom: 20, attribution: state.config.tiles_attribution }).addTo(state.map);
    } else {
      state.map = L.map(el, { crs: L.CRS.Simple, minZoom: -8, maxZoom: 6, zoomSnap: 0.25, preferCanvas: true });
      state.map.attributionControl.setPrefix("");
      grid.addTo(state.map);
      const note = L.control({ position: "bottomright" });
      note.onAdd = () => {
        gridNote = L.DomUtil.create("div", "grid-label");
        return gridNote;
      };
      note.addTo(state.map);
      state.map.on("moveend zoomend resize", drawGrid);
    }
    L.control.scale({ imperial: false }).addTo(state.map);
    state.result.addTo(state.map);
  }

  // ------------------------------------------------------------------ the map's photos

  function photoPopup(photo) {
    const box = L.DomUtil.create("div");
    const title = L.DomUtil.create("div", "", box);
    title.textContent = "#" + photo.id + " " + photo.path;
    const img = L.DomUtil.create("img", "popup-thumb", box);
    img.alt = photo.path;
    setThumb(img, "/api/photos/" + photo.id);
    return box;
  }

  function drawPhotos() {
    const layer = state.photos.length > state.config.cluster_above
      ? L.markerClusterGroup({ chunkedLoading: true, maxClusterRadius: 40 })
      : L.featureGroup();
    state.photoMarkers = state.photos.map((p) => {
      const marker = L.circleMarker(toLatLng(p), {
        radius: 4, color: "#3d4b5c", weight: 1, fillColor: "#8a97a8", fillOpacity: 0.9,
      });
      marker.bindPopup(() => photoPopup(p));
      return marker;
    });
    layer.addLayers ? layer.addLayers(state.photoMarkers) : state.photoMarkers.forEach((m) => layer.addLayer(m));
    layer.addTo(state.map);
    state.photoLayer = layer;
    if (state.photos.length) {
      state.map.fitBounds(L.latLngBounds(state.photoMarkers.map((m) => m.getLatLng())).pad(0.1));
    } else {
      state.map.setView([0, 0], 0);
    }
  }

  function showPhoto(id) {
    selectView("localize");
    const marker = state.photoMarkers[id];
    if (!marker) return;
    if (state.photoLayer.zoomToShowLayer) state.photoLayer.zoomToShowLayer(marker, () => marker.openPopup());
    else {
      state.map.panTo(marker.getLatLng());
      marker.openPopup();
    }
  }

  // ------------------------------------------------------------------ localizing

  function clearResult() {
    state.result.clearLayers();
    state.estimateMarker = null;
    state.matchMarkers = [];
    $("matches").replaceChildren();
    $("estimate").hidden = true;
    delete document.body.dataset.state;
  }

  async function localize(file) {
    clearResult();
    const preview = $("query-preview");
    preview.src = URL.createObjectURL(file);
    preview.hidden = false;
    setStatus("localizing " + file.name + " ...");
    const form = new FormData();
    form.append("images", file, file.name);
    form.append("top_k", $("top-k").value);
    form.append("rerank", $("rerank").checked ? "true" : "false");
    try {
      const answer = await (await api("/api/localize", { method: "POST", body: form })).json();
      showResult(answer);
    } catch (e) {
      setStatus(e.message, true);
      document.body.dataset.state = "error";
      if (e.status === 401 || e.status === 403) askToken();
    }
  }

  function showResult(answer) {
    state.last = answer;
    const result = answer.results[0];
    const est = result.estimate;
    const where = toLatLng(est);
    L.circle(where, {
      radius: Math.max(est.spread_m, 1), color: "#d7263d", weight: 1, fillOpacity: 0.12, interactive: false,
    }).addTo(state.result);
    const list = $("matches");
    for (const m of result.matches) {
      const marker = L.marker(toLatLng(m), {
        icon: L.divIcon({ className: "match-marker" + (m.in_group ? "" : " out-of-group"), html: String(m.rank) }),
        title: "match " + m.rank + ": photo " + m.id,
        zIndexOffset: 500 - m.rank,
      });
      marker.photoId = m.id;
      marker.bindPopup(() => photoPopup(m));
      marker.addTo(state.result);
      marker.getElement().dataset.photoId = m.id;
      state.matchMarkers.push(marker);

      const item = L.DomUtil.create("li", m.in_group ? "" : "out-of-group", list);
      item.dataset.photoId = m.id;
      item.dataset.rank = m.rank;
      const rank = L.DomUtil.create("span", "rank", item);
      rank.textContent = m.rank;
      const img = L.DomUtil.create("img", "", item);
      img.alt = m.path;
      setThumb(img, m.thumbnail_url);
      const text = L.DomUtil.create("span", "", item);
      const score = m.score === null ? "distance " + m.distance.toFixed(3) : "score " + m.score.toFixed(3);
      text.textContent = "photo " + m.id + " · " + score + (m.in_group ? " · agrees" : "");
      item.addEventListener("click", () => {
        state.map.panTo(marker.getLatLng());
        marker.openPopup();
      });
    }
    state.estimateMarker = L.marker(where, {
      icon: L.divIcon({ className: "estimate-marker" }), title: "estimate", zIndexOffset: 1000,
    }).addTo(state.result);
    const el = state.estimateMarker.getElement();
    el.dataset.latitude = est.latitude;
    el.dataset.longitude = est.longitude;
    const box = $("estimate");
    box.textContent = "";
    const lines = [
      "Estimate: " + est.latitude.toFixed(6) + ", " + est.longitude.toFixed(6),
      "confidence " + (100 * est.confidence).toFixed(0) + "%, within about " + est.spread_m.toFixed(1) + " m",
      "answered in " + (1000 * answer.timings.total_s).toFixed(0) + " ms",
    ];
    for (const line of lines) L.DomUtil.create("div", "", box).textContent = line;
    box.hidden = false;
    const bounds = L.latLngBounds([where].concat(state.matchMarkers.map((m) => m.getLatLng())));
    state.map.fitBounds(bounds.pad(0.4), { maxZoom: state.config.tiles ? 19 : 3 });
    setStatus(result.query + ": " + result.matches.length + " matches");
    document.body.dataset.state = "localized"; // what a test waits for
  }

  function setupDrop() {
    const drop = $("drop");
    $("photo-input").addEventListener("change", (e) => {
      if (e.target.files.length) localize(e.target.files[0]);
    });
    drop.addEventListener("dragover", (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      if (e.dataTransfer.files.length) localize(e.dataTransfer.files[0]);
    });
  }

  // ------------------------------------------------------------------ the photos view

  function selectView(name) {
    for (const tab of document.querySelectorAll(".tab")) tab.classList.toggle("active", tab.dataset.view === name);
    $("view-localize").hidden = name !== "localize";
    $("view-photos").hidden = name !== "photos";
    if (name === "localize") state.map.invalidateSize();
    else drawPage();
  }

  function drawPage() {
    const pages = Math.max(1, Math.ceil(state.photos.length / PAGE_SIZE));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    $("page-label").textContent = "page " + (state.page + 1) + " of " + pages + " (" + state.photos.length + " photos)";
    const grid = $("photo-grid");
    grid.replaceChildren();
    for (const p of state.photos.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE)) {
      const card = L.DomUtil.create("div", "photo", grid);
      card.dataset.photoId = p.id;
      const img = L.DomUtil.create("img", "", card);
      img.alt = p.path;
      img.loading = "lazy";
      setThumb(img, p.thumbnail_url);
      L.DomUtil.create("span", "", card).textContent = "#" + p.id + " " + p.path;
      L.DomUtil.create("span", "", card).textContent = p.latitude.toFixed(5) + ", " + p.longitude.toFixed(5);
      card.addEventListener("click", () => showPhoto(p.id));
    }
  }

  // ------------------------------------------------------------------ start

  function askToken() {
    $("token-form").hidden = false;
    setStatus("this server needs a token", true);
  }

  async function start() {
    const info = await (await api("/api/map")).json();
    state.info = info;
    const photos = [];
    while (photos.length < info.count) {
      const page = await (await api("/api/map/photos?offset=" + photos.length)).json();
      if (!page.photos.length) break;
      photos.push(...page.photos);
    }
    state.photos = photos;
    if (photos.length) {
      // The grid's origin: the photos' mean, rounded, so coordinates stay small and exact.
      const mean = (key) => photos.reduce((s, p) => s + p[key], 0) / photos.length;
      state.origin = { east: Math.round(mean("east")), north: Math.round(mean("north")) };
    }
    $("map-summary").textContent = info.count + " photos, " + info.method + " (" + info.weights.name + "), " +
      info.extent_m[0].toFixed(0) + " x " + info.extent_m[1].toFixed(0) + " m";
    $("top-k").max = info.server.max_top_k;
    $("top-k").value = Math.min(10, info.server.max_top_k);
    $("rerank").disabled = !info.has_local;
    makeMap();
    drawPhotos();
    setupDrop();
    for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectView(tab.dataset.view));
    $("prev-page").addEventListener("click", () => { state.page -= 1; drawPage(); });
    $("next-page").addEventListener("click", () => { state.page += 1; drawPage(); });
    setStatus("ready: drop a photo");
    document.body.dataset.ready = "true";
  }

  async function main() {
    state.config = await (await fetch("/page-config")).json();
    if (state.config.token_required) {
      // A token in the fragment (#token=...) never reaches a server log.
      const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
      state.token = fromHash || sessionStorage.getItem("vprkit-token");
      if (fromHash) {
        sessionStorage.setItem("vprkit-token", fromHash);
        history.replaceState(null, "", location.pathname); // out of the address bar
      }
    }
    $("token-form").addEventListener("submit", (e) => {
      e.preventDefault();
      state.token = $("token").value;
      sessionStorage.setItem("vprkit-token", state.token);
      location.reload();
    });
    if (state.config.token_required && !state.token) return askToken();
    try {
      await start();
    } catch (e) {
      setStatus(e.message, true);
      if (e.status === 401 || e.status === 403) askToken();
    }
  }

  window.vprkitPage = { state, toLatLng, fromLatLng }; // for tests and the curious
  main();
})();
