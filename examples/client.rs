//! Using the client library against a running cluster:
//! `cargo run -p ragfleet-client --example client -- cluster.toml "what is a trait object"`.
//! It depends on `ragfleet-client` alone (with the plain data of `ragfleet-proto` and
//! `ragfleet-config`): no index, model or role actor is compiled into it.
use std::sync::Arc;
use std::time::Duration;

use ragfleet_client::Client;
use ragfleet_config::ClusterConfig;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let config = args.next().unwrap_or_else(|| "cluster.toml".into());
    let question = args.collect::<Vec<_>>().join(" ");
    let question = if question.is_empty() {
        "What is a trait object?".to_string()
    } else {
        question
    };
    let cfg = Arc::new(ClusterConfig::load(config.as_ref())?);
    let client = Client::connect(cfg, Duration::from_secs(10)).await?;
    let r = client.retrieve(&question, Default::default()).await?;
    println!(
        "coverage {}/{}",
        r.coverage.shards_answered, r.coverage.shards_total
    );
    for h in r.hits.iter().take(3) {
        println!("{:.3} {}", h.score, h.chunk_id);
    }
    let mut answer = client.ask(&question, Default::default()).await?;
    while let Some(chunk) = answer.next().await {
        print!("{}", chunk?.text);
    }
    println!();
    Ok(())
}
