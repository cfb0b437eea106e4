//! The simulated network: when a message sent at a given time arrives.
//!
//! Invariants:
//! 1. Delivery is reliable and exactly once, as over a session's TCP connection: a lost message is
//!    retransmitted after the retransmission timeout until it gets through, and a message sent
//!    into a partition is held until the partition heals. Only a server crash loses messages (the
//!    connection drops; the engine handles that with connection epochs). Ordering within a
//!    connection is the engine's job: it keeps each direction of a session in order.
//! 2. Every random draw comes from the caller's seeded generator, so a deterministic run draws the
//!    same numbers in the same order every time.

use crate::config::{Config, Latency, Micros, Window};
use rand::Rng;
use rand_distr::{Distribution, Exp, Normal};

/// Draws one duration from `latency`.
pub fn sample(latency: Latency, rng: &mut impl Rng) -> Micros {
    match latency {
        Latency::Fixed(m) => m,
        Latency::Uniform(low, high) => rng.random_range(low..=high),
        Latency::Exp(0) | Latency::Normal(0, 0) => 0,
        Latency::Exp(mean) => match Exp::new(1.0 / mean as f64) {
            Ok(exp) => exp.sample(rng) as Micros,
            Err(_) => mean,
        },
        Latency::Normal(mean, sd) => match Normal::new(mean as f64, sd as f64) {
            Ok(normal) => normal.sample(rng).max(0.0) as Micros,
            Err(_) => mean,
        },
    }
}

/// What the network did to one message.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct Delivery {
    /// When it arrives.
    pub at: Micros,
    /// How many times it was lost and sent again.
    pub retransmits: u32,
    /// Whether a partition held it back.
    pub partitioned: bool,
}

/// The network's parameters, taken from the run's [`Config`].
#[derive(Clone, Debug)]
pub struct Network {
    latency: Latency,
    jitter: Micros,
    loss: f64,
    rto: Micros,
    partitions: Vec<Window>,
}

impl Network {
    /// The network a run's configuration describes.
    pub fn new(config: &Config) -> Self {
        Network {
            latency: config.latency,
            jitter: config.jitter,
            loss: config.loss,
            rto: config.rto,
            partitions: config.partitions.clone(),
        }
    }

    /// When a message sent at `sent` arrives (invariant 1).
    pub fn deliver(&self, sent: Micros, rng: &mut impl Rng) -> Delivery {
        let mut delivery = Delivery::default();
        let mut send = sent;
        // A message sent during a partition waits for it to heal, then goes out again.
        if let Some(window) = self.partition_at(send) {
            send = window.end();
            delivery.partitioned = true;
        }
        // Loss is bounded by validation (loss < 1); the loop stops after 64 losses anyway.
        while self.loss > 0.0 && delivery.retransmits < 64 && rng.random_bool(self.loss) {
            delivery.retransmits += 1;
            send += self.rto;
            if let Some(window) = self.partition_at(send) {
                send = window.end();
                delivery.partitioned = true;
            }
        }
        let jitter = if self.jitter > 0 {
            rng.random_range(0..=self.jitter)
        } else {
            0
        };
        delivery.at = send + sample(self.latency, rng) + jitter;
        delivery
    }

    fn partition_at(&self, at: Micros) -> Option<Window> {
        self.partitions
            .iter()
            .copied()
            .find(|w| w.start <= at && at < w.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn partitions_hold_messages_and_loss_retransmits() {
        let config = Config {
            latency: Latency::Fixed(100),
            jitter: 0,
            loss: 0.0,
            partitions: vec![Window {
                start: 1000,
                length: 500,
            }],
            ..Config::default()
        };
        let net = Network::new(&config);
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(7);
        assert_eq!(net.deliver(0, &mut rng).at, 100);
        let held = net.deliver(1200, &mut rng);
        assert_eq!((held.at, held.partitioned), (1600, true));

        let lossy = Network::new(&Config {
            loss: 0.5,
            rto: 1000,
            partitions: Vec::new(),
            ..config
        });
        let (mut lost, mut late) = (0, 0);
        for _ in 0..1000 {
            let d = lossy.deliver(0, &mut rng);
            lost += d.retransmits;
            late += u32::from(d.at >= 1100);
            assert_eq!(d.at, u64::from(d.retransmits) * 1000 + 100);
        }
        assert!(lost > 600 && late > 300, "lost {lost}, late {late}");
    }

    #[test]
    fn samples_stay_in_their_ranges() {
        let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(1);
        for _ in 0..1000 {
            let u = sample(Latency::Uniform(10, 20), &mut rng);
            assert!((10..=20).contains(&u));
            let _ = sample(Latency::Normal(10, 50), &mut rng);
        }
        let mean: u64 = (0..10_000)
            .map(|_| sample(Latency::Exp(1000), &mut rng))
            .sum::<u64>()
            / 10_000;
        assert!((900..1100).contains(&mean), "exp mean {mean}");
        assert_eq!(sample(Latency::Exp(0), &mut rng), 0);
    }
}
