//! Warnings go through `tracing`; when the program has no subscriber, to standard error, so that a
//! cache that silently stopped working can never go unnoticed.

pub(crate) fn warn(message: &str) {
    let has_subscriber =
        tracing::dispatcher::get_default(|d| !d.is::<tracing::subscriber::NoSubscriber>());
    if has_subscriber {
        tracing::warn!(target: "memo", "{message}");
    } else {
        eprintln!("memo: warning: {message}");
    }
}
