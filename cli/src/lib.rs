//! Shared pieces of the `cairn` and `cairnctl` binaries.

pub mod poolbench;
pub mod system;
pub mod table;

/// An error chain as one line; a gRPC status shows its code and message
/// rather than its debug form.
pub fn one_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = match cause.downcast_ref::<tonic::Status>() {
            Some(s) => format!("{} ({:?})", s.message(), s.code()),
            None => cause.to_string(),
        };
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_are_one_line() {
        let e = anyhow::Error::new(tonic::Status::not_found("volume x not found\nmore"))
            .context("getting volume");
        let line = one_line(&e);
        assert_eq!(line, "getting volume: volume x not found more (NotFound)");
    }
}
