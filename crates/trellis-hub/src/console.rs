//! The browser console. For now one page that says where things are; the
//! full console (projects, stages, outpost status) is built on this route.

use axum::response::Html;

pub async fn index() -> Html<&'static str> {
    Html(concat!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        "<title>Trellis</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;padding:0 1rem;line-height:1.5}",
        "code{background:#f3f3f3;padding:0 .3em}</style></head><body>",
        "<h1>Trellis hub</h1>",
        "<p>This hub is running. The browser console is not built yet; use the ",
        "<code>trellis</code> command line (<code>trellis --help</code>) or the HTTP API.</p>",
        "<p>API description: <a href=\"/api/v1/openapi.json\">/api/v1/openapi.json</a></p>",
        "</body></html>"
    ))
}
