//! The `ledger` table read with plain SQL, as an operator or an EdgeLake master reads it.

use diesel::{Connection, PgConnection, RunQueryDsl, SqliteConnection};
use ledger_storage::DatabaseUrl;

/// One row of the `ledger` table: the columns EdgeLake's master fills.
#[derive(diesel::QueryableByName, Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    /// The policy's id.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub policy_id: String,
    /// Its type.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub policy_type: String,
    /// Its `company`.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub company_name: Option<String>,
    /// `date` as text (`YYYY-MM-DD HH:MM:SS.ffffff`).
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub date: String,
    /// The inserting client's address.
    #[diesel(sql_type = diesel::sql_types::Text)]
    pub host: String,
    /// Its `status`.
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
    pub status: Option<String>,
}

/// Every row of the `ledger` table of `db`, ordered by `date` as EdgeLake's master reads it.
pub fn ledger_rows(db: &DatabaseUrl) -> Vec<LedgerRow> {
    let query = diesel::sql_query(
        "SELECT policy_id, policy_type, company_name, CAST(date AS TEXT) AS date, host, status \
         FROM ledger ORDER BY date",
    );
    match db {
        DatabaseUrl::Sqlite(path) => query
            .load(&mut SqliteConnection::establish(&path.to_string_lossy()).unwrap())
            .unwrap(),
        DatabaseUrl::Postgres(url) => query
            .load(&mut PgConnection::establish(url).unwrap())
            .unwrap(),
    }
}
