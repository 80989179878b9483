// node-postgres (a pure JavaScript protocol implementation) through the proxy.
// Prints one JSON line of facts for the Rust test to check.
const { Client } = require('pg');

(async () => {
  const client = new Client({ connectionString: process.env.PROXY_URL });
  await client.connect();
  const out = {};
  let r = await client.query('SELECT pg_is_in_recovery() AS rec');
  out.simpleOnReplica = r.rows[0].rec;
  r = await client.query('SELECT $1::int + 1 AS v, pg_is_in_recovery() AS rec', [41]);
  out.paramValue = r.rows[0].v;
  out.paramOnReplica = r.rows[0].rec;
  // A named prepared statement executed many times: re-prepared on each new backend.
  out.namedOk = true;
  for (let i = 0; i < 30; i++) {
    r = await client.query({ name: 'who', text: 'SELECT $1::int AS i, pg_is_in_recovery() AS rec', values: [i] });
    if (r.rows[0].i !== i || r.rows[0].rec !== true) out.namedOk = false;
  }
  await client.query('BEGIN');
  await client.query('INSERT INTO node_driver VALUES ($1)', [7]);
  r = await client.query('SELECT count(*)::int AS n, pg_is_in_recovery() AS rec FROM node_driver');
  out.txCount = r.rows[0].n;
  out.txOnReplica = r.rows[0].rec;
  await client.query('COMMIT');
  try {
    await client.query('SELECT 1 / 0');
  } catch (e) {
    out.errorCode = e.code;
  }
  r = await client.query('SELECT 1 AS one');
  out.afterError = r.rows[0].one;
  await client.query("SET application_name = 'node-test'");
  out.settingKept = true;
  for (let i = 0; i < 6; i++) {
    r = await client.query('SHOW application_name');
    if (r.rows[0].application_name !== 'node-test') out.settingKept = false;
  }
  console.log(JSON.stringify(out));
  await client.end();
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
