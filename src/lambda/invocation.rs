//! What an invocation counts, written where CloudWatch reads it.

/// Installs the recorder that turns what an invocation counts ([`crate::metrics`], the names
/// `palaver serve`'s `/metrics` shows) into CloudWatch Embedded Metric Format: a JSON line in
/// the function's log that CloudWatch makes metrics of, with no agent and no API call.
/// Namespace `palaver`, dimension `function`.
pub fn embedded_metrics(
    function: &'static str,
) -> Result<&'static metrics_cloudwatch_embedded::Collector, lambda_runtime::Error> {
    let collector = metrics_cloudwatch_embedded::Builder::new()
        .cloudwatch_namespace("palaver")
        .with_dimension("function", function)
        .init()?;
    crate::metrics::describe();
    Ok(collector)
}

/// Runs one invocation's `work`, then writes what it counted as one EMF line to stdout, the
/// function's log.
pub async fn counted<T>(
    collector: &metrics_cloudwatch_embedded::Collector,
    work: impl std::future::Future<Output = T>,
) -> T {
    let answer = work.await;
    if let Err(error) = collector.flush(std::io::stdout().lock()) {
        tracing::warn!(%error, "could not write the invocation's metrics");
    }
    answer
}

/// When the invocation times out, as a tokio instant (Lambda gives it as milliseconds since the
/// epoch). An invocation without one, or with one already past when it starts — which Lambda
/// never sends, but an emulator may (cargo-lambda's does) — gets Lambda's longest, 15 minutes.
pub fn deadline_of(context: &lambda_runtime::Context) -> tokio::time::Instant {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let left = match context.deadline.checked_sub(now_ms) {
        Some(left) if left > 0 => std::time::Duration::from_millis(left),
        _ => std::time::Duration::from_secs(15 * 60),
    };
    tokio::time::Instant::now() + left
}
