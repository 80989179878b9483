use replicator::testbed::{Cluster, ClusterOptions};

#[test]
fn cluster_has_a_primary_and_two_streaming_replicas() {
    let cluster = Cluster::start(ClusterOptions::default()).unwrap();
    assert_eq!(
        cluster
            .primary
            .psql("app", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "f"
    );
    for r in &cluster.replicas {
        assert_eq!(r.psql("app", "SELECT pg_is_in_recovery()").unwrap(), "t");
    }
    cluster
        .primary
        .psql(
            "app",
            "CREATE TABLE smoke(id int); INSERT INTO smoke VALUES (1)",
        )
        .unwrap();
    cluster
        .wait_caught_up(std::time::Duration::from_secs(10))
        .unwrap();
    assert_eq!(
        cluster.replicas[1]
            .psql("app", "SELECT count(*) FROM smoke")
            .unwrap(),
        "1"
    );
}
