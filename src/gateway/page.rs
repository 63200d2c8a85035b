//! `GET /` for a browser: the chat page, one self-contained file.

use axum::response::Html;

const PAGE: &str = include_str!("page.html");

pub async fn index() -> Html<&'static str> {
    Html(PAGE)
}
