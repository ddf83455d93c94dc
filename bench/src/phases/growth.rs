//! Phase 6, growth: drain rate with few and with many published rows kept.

use std::time::Instant;

use anyhow::Result;

use super::Bench;
use crate::results::DrainRun;

impl Bench {
    pub(crate) async fn growth_once(&self, kept: u64, run: usize) -> Result<DrainRun> {
        let schema = format!("bench_growth_{kept}_{run}");
        self.fresh_schema(&self.db, &self.args.database_url, &schema)
            .await?;
        let r = async {
            let t = Instant::now();
            self.insert_rows(&schema, kept, true).await?;
            progress!(
                "growth: {kept} published rows inserted in {:.1}s",
                t.elapsed().as_secs_f64()
            );
            self.insert_rows(&schema, self.args.messages, false).await?;
            self.settle_table(&schema).await?;
            self.drain_once(&schema, &format!("growth-{kept}-{run}"))
                .await
        }
        .await;
        self.drop_schema(&schema).await;
        r
    }
}
