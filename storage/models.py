"""Tables of SPEC §4.1; names are those of the original database."""
from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (Boolean, CheckConstraint, Float, ForeignKey, Index, Integer, String,
                        Text, UniqueConstraint, Uuid)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from storage.types import JSONType, UTCDateTime, utcnow


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSONType, uuid.UUID: Uuid}


def _pk() -> Mapped[uuid.UUID]:
    return mapped_column(primary_key=True, default=uuid.uuid4)


def _user_fk() -> Mapped[uuid.UUID]:
    return mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)


class User(Base):
    __tablename__ = "user"
    id: Mapped[uuid.UUID] = _pk()
    dontdie_uid: Mapped[str | None] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class SelfModel(Base):
    __tablename__ = "selfmodel"
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    belief_systems: Mapped[list["BeliefSystem"]] = relationship(
        back_populates="self_model", cascade="all, delete-orphan", passive_deletes=True,
        order_by="BeliefSystem.name")


class BeliefSystem(Base):
    __tablename__ = "beliefsystem"
    __table_args__ = (UniqueConstraint("self_model_id", "name", name="uq_beliefsystem_model_name"),)
    id: Mapped[uuid.UUID] = _pk()
    self_model_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("selfmodel.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    self_model: Mapped[SelfModel] = relationship(back_populates="belief_systems")
    beliefs: Mapped[list["Belief"]] = relationship(
        back_populates="belief_system", cascade="all, delete-orphan", passive_deletes=True,
        order_by="Belief.created_at")


class Belief(Base):
    __tablename__ = "belief"
    __table_args__ = (
        CheckConstraint("confidence >= 0 AND confidence <= 1", name="ck_belief_confidence"),
        UniqueConstraint("belief_system_id", "external_id", name="uq_belief_external"),
    )
    id: Mapped[uuid.UUID] = _pk()
    belief_system_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("beliefsystem.id", ondelete="CASCADE"), index=True)
    context_uuid: Mapped[uuid.UUID | None] = mapped_column()
    statement: Mapped[str] = mapped_column(Text)
    confidence: Mapped[float] = mapped_column(Float)
    belief_type: Mapped[str | None] = mapped_column(String(64))
    external_id: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    belief_system: Mapped[BeliefSystem] = relationship(back_populates="beliefs")


class Measurement(Base):
    __tablename__ = "measurement"
    __table_args__ = (
        UniqueConstraint("user_id", "type", "captured_at", "source", name="uq_measurement_key"),
        Index("ix_measurement_user_type_time", "user_id", "type", "captured_at"),
        Index("ix_measurement_type_time", "type", "captured_at"),
    )
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(200))
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(200))
    captured_at: Mapped[datetime] = mapped_column()
    # '' rather than NULL so the idempotency key stays unique on every database.
    source: Mapped[str] = mapped_column(String(200), default="")


class UserFile(Base):
    __tablename__ = "userfile"
    __table_args__ = (Index("ix_userfile_user_time", "user_id", "uploaded_at"),)
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    s3_key: Mapped[str] = mapped_column(String(500), unique=True)
    filename: Mapped[str] = mapped_column(String(255))
    mime: Mapped[str] = mapped_column(String(200))
    declared_mime: Mapped[str | None] = mapped_column(String(200))
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    uploaded_at: Mapped[datetime] = mapped_column(default=utcnow)


class ChecklistItem(Base):
    __tablename__ = "checklistitem"
    __table_args__ = (UniqueConstraint("user_id", "bucket_code", name="uq_checklist_user_bucket"),)
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = _user_fk()
    bucket_code: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(32), default="pending")
    data_ref: Mapped[dict[str, Any] | None] = mapped_column()
    source: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ProtocolTemplate(Base):
    __tablename__ = "protocoltemplate"
    id: Mapped[uuid.UUID] = _pk()
    habit_type: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    cue: Mapped[str] = mapped_column(Text)
    routine: Mapped[str] = mapped_column(Text)
    reward: Mapped[str] = mapped_column(Text)
    dd_protocol_json: Mapped[dict[str, Any]] = mapped_column()
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Conversation(Base):
    __tablename__ = "conversation"
    __table_args__ = (Index("ix_conversation_user_time", "user_id", "started_at"),)
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed: Mapped[bool] = mapped_column(Boolean, default=False)
    meta: Mapped[dict[str, Any] | None] = mapped_column()
    turns: Mapped[list["Turn"]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="(Turn.created_at, Turn.seq)")


class Turn(Base):
    __tablename__ = "turn"
    __table_args__ = (Index("ix_turn_conversation_seq", "conversation_id", "seq"),)
    id: Mapped[uuid.UUID] = _pk()
    conversation_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("conversation.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer, default=0)
    role: Mapped[str] = mapped_column(String(32))
    content: Mapped[str] = mapped_column(Text)
    extra_json: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dialectic(Base):
    __tablename__ = "dialectic"
    __table_args__ = (
        Index("ix_dialectic_user_time", "user_id", "started_at"),
        UniqueConstraint("user_id", "external_id", name="uq_dialectic_external"),
    )
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    self_model_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("selfmodel.id", ondelete="SET NULL"))
    learning_objective: Mapped[dict[str, Any] | None] = mapped_column()
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed: Mapped[bool] = mapped_column(Boolean, default=False)
    conversation_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("conversation.id", ondelete="SET NULL"))
    external_id: Mapped[str | None] = mapped_column(String(200))
    interactions: Mapped[list["DialecticInteraction"]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True,
        order_by="(DialecticInteraction.created_at, DialecticInteraction.seq)")


class DialecticInteraction(Base):
    __tablename__ = "dialecticinteraction"
    __table_args__ = (Index("ix_dialecticinteraction_dialectic_seq", "dialectic_id", "seq"),)
    id: Mapped[uuid.UUID] = _pk()
    dialectic_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("dialectic.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer, default=0)
    role: Mapped[str] = mapped_column(String(32))
    content: Mapped[str] = mapped_column(Text)
    extra_json: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DDUserData(Base):
    __tablename__ = "dd_user_data"
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), unique=True)
    dontdie_uid: Mapped[str | None] = mapped_column(String(200))
    sync_status: Mapped[str] = mapped_column(String(32), default="not_synced")
    last_synced: Mapped[datetime | None] = mapped_column()
    measurements: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    capabilities: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    biomarkers: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    protocols: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    dd_scores: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    sync_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DDSyncLog(Base):
    __tablename__ = "dd_sync_log"
    __table_args__ = (Index("ix_dd_sync_log_user_time", "user_id", "created_at"),)
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    sync_type: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    endpoint: Mapped[str | None] = mapped_column(String(200))
    records_synced: Mapped[int] = mapped_column(Integer, default=0)
    duration_ms: Mapped[int | None] = mapped_column(Integer)
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class DDCredential(Base):
    __tablename__ = "dd_credential"
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), unique=True)
    dontdie_uid: Mapped[str] = mapped_column(String(200))
    client_id: Mapped[str] = mapped_column(String(200))
    token_ciphertext: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class ApiToken(Base):
    __tablename__ = "api_token"
    __table_args__ = (CheckConstraint("kind IN ('user','service','admin')", name="ck_api_token_kind"),)
    id: Mapped[uuid.UUID] = _pk()
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column()
    revoked_at: Mapped[datetime | None] = mapped_column()
    last_used_at: Mapped[datetime | None] = mapped_column()


class SimulationJob(Base):
    __tablename__ = "simulation_job"
    __table_args__ = (
        Index("ix_simulation_job_user_time", "user_id", "created_at"),
        Index("ix_simulation_job_status", "status"),
        UniqueConstraint("user_id", "idempotency_key", name="uq_simulation_job_idempotency"),
    )
    id: Mapped[uuid.UUID] = _pk()
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"))
    template: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    last_error: Mapped[str | None] = mapped_column(Text)
    conversation_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("conversation.id", ondelete="SET NULL"))
    metrics: Mapped[dict[str, Any] | None] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
